from sd35hub.frontends.cli import main

if __name__ == "__main__":
    main()
