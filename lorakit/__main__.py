from lorakit.cli import run

run()
