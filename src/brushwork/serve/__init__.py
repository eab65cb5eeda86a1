"""`brushwork serve`: an HTTP service (native, OpenAI- and AUTOMATIC1111-compatible APIs, a web page)."""
