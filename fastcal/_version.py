"""fastcal's version, one place for the package and its saved states."""
__version__ = "0.1.0"
