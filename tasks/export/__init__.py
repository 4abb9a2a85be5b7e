"""Export to Ollama: settings and gate, llama.cpp's converter, the Modelfile, llama.cpp's checks."""
