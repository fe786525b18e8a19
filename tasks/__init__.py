"""Prefect tasks: each one calls a single requant library function."""
