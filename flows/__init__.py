"""Prefect flows of requant."""
