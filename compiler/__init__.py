"""Export, backends, validation, reports and the CLI."""
