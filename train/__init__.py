"""Training and evaluation of avloc models. Imports ``avloc.core``; nothing imports it back."""
