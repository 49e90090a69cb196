"""The command-line programs: one module per command, each with a `run()` entry point.

Every module here is a command (setup.py installs each as the console script
`tf-consreg-<module>`, and bin/<module>.py runs it from a checkout): its
docstring is the --help text, its module-level flags are the command's
flags, and its `main` builds one validated config and makes one library call.

One command per program rather than one `tf-consreg` with subcommands: absl's
flags live in one process-global registry, and the commands define flags of
the same name with different help and defaults (--dataset, --model_dir,
--batch_size, ...), so two commands cannot be imported into one process.
Dispatching on a subcommand before importing its module would work for a
plain command line, but --flagfile could not choose the subcommand and a
top-level --help could not list the flags of any one of them. Separate
programs keep absl's own --help, --helpfull and --flagfile as they are.

Importing this package imports no command (each defines its flags when it
is imported).
"""
