"""What an answer may say: lead choices, citations, names, quoted code and labels, checked while and after decoding."""
