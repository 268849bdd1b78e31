from lorakit.cli.main import run

run()
