"""Device families: scanners, the catalog, printers and print jobs, climate
sensors with their rooms and history. Each family is a service the
daemon starts; none imports web/ or ops/.
"""
