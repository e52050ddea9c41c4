from kvlab.serve.cli import main

main()
