"""Benchmarks for `revgan-med benchmark NAME`; each module has `HELP`, `add_arguments(parser)`, `run(args)`.
"""
