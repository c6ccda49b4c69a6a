"""Typer commands: parse options, build the config, call one core function, print."""
