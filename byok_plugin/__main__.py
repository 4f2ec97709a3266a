from byok_plugin.cli import main

main(prog_name="byok")
