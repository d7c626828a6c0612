"""The slmedge CLI and repository scripts."""
