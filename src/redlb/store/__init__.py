"""Everything that talks to Redis lives in this package; keys.py documents the schema."""
