"""The `shardyard` command: the top layer of the package map (nothing imports it).

main.py parses the command line and dispatches; preflight.py is the one check validate | run | submit
share; job_commands.py, cluster_commands.py and run_commands.py hold the thin commands; output.py
formats everything the user reads from what the layers below return; job_entry.py is the entrypoint
of a submitted Ray job.
"""
