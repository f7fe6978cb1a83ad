"""One module per `token-reset` command, named by its verb.

Each holds ``async def command(settings, args) -> int``; listener.cli imports only the
one the command line asks for, so `token-reset migrate` never loads the service.
"""
