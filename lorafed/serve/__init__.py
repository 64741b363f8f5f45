"""After a federation: combine adapters, export a merged model, predict and serve."""
