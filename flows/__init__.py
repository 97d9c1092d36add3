"""Orchestration only: Prefect flows and tasks that call pipeline functions. Nothing imports flows."""
