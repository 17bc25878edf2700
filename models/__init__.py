"""restwise.models: metric vocabulary, features against personal baselines, networks, the model
registry, training, evaluation. Imports only ``restwise.common`` from Restwise."""
