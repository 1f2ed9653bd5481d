"""The `payguard` console: operators and the host application (entry point `cli.main:main`)."""
