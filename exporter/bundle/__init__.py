"""An exported artifact made ready to drop into an app: the bundle and its integration
snippets."""
