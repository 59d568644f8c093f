"""The command line: one module per subcommand, and their shared options."""
