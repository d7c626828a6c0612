"""The ``slmedge`` command: flags -> typed config -> library call; progress is drawn here."""
