"""The ground floor: errors, file writing, model loading, config basics. Imports nothing of ours."""
