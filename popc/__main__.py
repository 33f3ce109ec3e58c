from popc.cli import app

app(prog_name="popc")
