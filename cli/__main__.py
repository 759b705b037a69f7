from adaptermerge_cli.main import main

main()
