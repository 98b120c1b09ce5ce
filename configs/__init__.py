"""The YAML configs shipped with avloc (package data of ``avloc.configs``): ``--config NAME`` finds them by name
(``avloc.core.config.packaged_config``), so an installed wheel needs no checkout."""
