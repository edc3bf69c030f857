"""The `shardyard` command: the top layer of the package map (nothing imports it).

main.py parses the command line and dispatches; preflight.py is the one check validate | run | submit
share; job_commands.py, cluster_commands.py and run_commands.py hold the thin commands; output.py
formats everything the user reads from what the layers below return; job_entry.py is the entrypoint
of a submitted Ray job.

Modules that import torch or Ray (the runtime, models, data) are imported inside the command that
needs them: `shardyard schema`, `status` or `list` start in a fraction of a second instead of the
~10 s that importing every command's dependencies takes.
"""
