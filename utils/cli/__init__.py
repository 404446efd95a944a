"""The commands, one module each (the top-level scripts of a clone and the installed console scripts run them):
``get_args_parser()``, ``main(args)`` and ``cli()``, the command line."""
