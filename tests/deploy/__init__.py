"""Checks for deploy/ and the Dockerfile: pure file and tool tests, no database."""
