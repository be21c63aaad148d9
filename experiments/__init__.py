"""The command-line entry points (hydra or argparse shells over ``agents``): simulate, evaluate, train,
export, reproduce, validate, import_shared_data. Each runs as ``python experiments/<name>.py`` or
``python -m servegym.experiments.<name>``; they import the library packages, never each other."""
