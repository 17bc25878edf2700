"""restwise.models: metric vocabulary, features against personal baselines, networks, training,
evaluation. Imports nothing else from Restwise."""
