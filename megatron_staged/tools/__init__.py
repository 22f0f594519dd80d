"""Command implementations behind ``megatron-staged`` subcommands (each module has ``main(argv)``)."""
