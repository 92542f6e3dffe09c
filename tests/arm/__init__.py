"""The Arm lane (see README.md). A package so its conftest does not shadow tests/conftest.py."""
