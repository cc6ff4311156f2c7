"""Private Triton kernels. Users call the public functions in moeprec; nothing here is API."""
