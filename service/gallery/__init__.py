"""Searchable identities: exported class centers plus identities enrolled at run time."""
