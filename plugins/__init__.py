"""The built-in backends, registered under the ``broker.plugins`` entry-point group."""
