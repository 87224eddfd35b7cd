"""DVC stage entry points, one module per stage, run as `python -m stages.<name> ...` from dvc.yaml.

Each validates params, calls the library, and writes its outputs; paths come from the command line
(dvc.yaml owns them)."""
