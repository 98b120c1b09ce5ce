"""Running a pipeline: the launcher and what starts it.

``launcher`` (starts the processes from ``ProcessSpec``s, watches heartbeats, restarts, stops in order),
``pipeline`` (the process specs and endpoints of a pipeline), ``args`` (the options the command lines share),
``report`` (the latency log read and summarized), and the command lines ``avloc run`` (``run_cli``),
``avloc replay`` (``replay_cli``) and ``avloc worker`` (``worker_cli``, one process of a multi-host pipeline). The
launcher starts processes by module name, through ``child_entry`` (``python -m avloc.stream.run.child_entry PID
avloc.stream.capture.camera ...``, which sets the child's death signal first), so it imports the process
rooms only for shared constants and the pieces it runs itself (the sharding proxy).
"""
