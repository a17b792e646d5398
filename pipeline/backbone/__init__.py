"""The frozen VGG16 body that both stages share: its weights by name (weights), the network and its poolings in
torch (vgg16). Stage one runs it over images; the block5 head fine-tunes its last block; export writes it out.
"""
