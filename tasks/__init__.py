"""Prefect tasks: one per pipeline step, each a thin wrapper over a `mirotrain` engine command.

Every module is also a command line (``python -m tasks.<name> --help``) with the same parameters as its
task, so a step can be re-run by hand, from a Slurm script or from a Kubernetes pod. The engine never
imports from here; imports point ``pipelines -> tasks -> mirotrain``.
"""
