"""``python -m motionsep_cli`` runs the command line."""

from motionsep_cli.app import main

if __name__ == "__main__":
    main()
