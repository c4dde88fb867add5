"""The WeCLIP pipeline: one module per DVC stage, run as Prefect flows by the `weclip` command
(pipeline/cli.py)."""
