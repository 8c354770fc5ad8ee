"""The data path: client connection -> pick -> upstream connection -> response."""
