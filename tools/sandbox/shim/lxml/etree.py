from xml.etree.ElementTree import *  # noqa: F403
