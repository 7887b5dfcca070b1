"""The paper's studies (balancing, data scaling, distillation, continual stages), one command each."""
