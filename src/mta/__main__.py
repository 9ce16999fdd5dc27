from mta.cli.main import entry

if __name__ == "__main__":  # not when imported (a spawned process of `mta tune --jobs` reads its parent's main)
    entry()
