from slimformer.cli import main

main()
