from satrun.cli.main import entry

entry()
