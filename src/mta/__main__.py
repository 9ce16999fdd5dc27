from mta.cli.main import entry

entry()
