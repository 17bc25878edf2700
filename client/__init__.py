"""restwise.client: the device. Encrypted store, keys, importers, ClientApp, device CLI, coach."""
